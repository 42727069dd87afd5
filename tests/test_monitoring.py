"""Monitoring on real gateways: features read from each request into the log (JSON, batches,
binary tensors), references built from a CSV or Parquet training file or pinned from the log,
a window's statistics in ``model-gateway drift``, ``/admin/drift``, ``/admin/report`` and
``/metrics``, equal to scipy's on the values sent; two replicas on one PostgreSQL agree;
the shipped example runs; any request body gives features or none, never an error."""

from __future__ import annotations

import asyncio
import csv
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from model_gateway.cli import main
from model_gateway.config import MonitoringConfig, load_config
from model_gateway.features import MAX_FEATURE_ROWS, FeatureReader, feature_spec, features_text
from model_gateway.tensors import encode

from .conftest import GatewayFactory, InProcessFactory, RunningGateway, Upstream, wait_until
from .test_store import POSTGRES, drop_schema, record, store_url, with_store

__all__ = ["store_url"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(300)

SEED = 20261206
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "examples" / "drift.yaml"
FEATURES = [{"name": f"x{i}", "input": "x", "column": i, "range": [-4, 4]} for i in range(4)]
CHANNEL = {"name": "channel", "pointer": "/parameters/channel", "kind": "categorical"}


def monitored_route(url: str, **monitoring: Any) -> dict[str, Any]:
    return {
        "name": "fraud",
        "path": "/v2/models/fraud",
        "evaluation": {"prediction": "/outputs/1/data/0", "score": "/outputs/0/data/0"},
        "monitoring": {"features": [*FEATURES, CHANNEL], "interval": 0.2, **monitoring},
        "variants": [{"name": "a", "url": url, "model_version": "1"}],
    }


def infer(rows: np.ndarray, channel: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "x", "shape": list(rows.shape), "datatype": "FP64",
             "data": rows.ravel().tolist()}
        ]
    }  # fmt: skip
    if channel is not None:
        body["parameters"] = {"channel": channel}
    return body


def send_traffic(url: str, rng: np.random.Generator, requests: int, shift: float) -> np.ndarray:
    """``requests`` requests (every tenth a batch of 5 rows, every tenth without a channel);
    the feature rows sent."""
    sent = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(requests):
            rows = rng.normal(size=(5 if i % 10 == 3 else 1, 4))
            rows[:, 0] += shift
            channel = None if i % 10 == 7 else ("web" if i % 3 else "app")
            answer = client.post("/v2/models/fraud/infer", json=infer(rows, channel))
            assert answer.status_code == 200, answer.text
            sent.append(rows)
    return np.concatenate(sent)


def write_training_csv(path: Path, columns: dict[str, Any]) -> None:
    names = list(columns)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in zip(*(columns[n] for n in names), strict=True):
            writer.writerow(["" if v is None else v for v in row])


def training(rng: np.random.Generator, n: int = 2000) -> dict[str, Any]:
    columns: dict[str, Any] = {f"x{i}": rng.normal(size=n).tolist() for i in range(4)}
    columns["channel"] = ["web" if i % 3 else "app" for i in range(n)]
    columns["score"] = rng.beta(2, 5, size=n).tolist()
    return columns


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def records_with_features(gw: RunningGateway) -> list[dict[str, Any]]:
    return [r for r in gw.records() if r["features"] is not None]


def test_features_are_read_from_json_batches_and_binary_tensors(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([{**monitored_route(upstreams["a"].url), "max_body_bytes": 1024}])
    rows = np.array([[0.5, -1.0, 2.0, 3.5], [1.5, 0.0, -2.0, 9.0]])
    assert gw.http.post("/v2/models/fraud/infer", json=infer(rows, "web")).status_code == 200
    # the binary tensor extension (tritonclient's default): a JSON header, then raw FP32
    raw = encode("FP32", [0.25, 0.5, 0.75, 1.0])
    head = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": len(raw)}}]}
    )  # fmt: skip
    answer = gw.http.post(
        "/v2/models/fraud/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert gw.http.post("/v2/models/fraud/infer", content=b"not json").status_code == 400
    # refused before its body was read: nothing of the data, no feature counted missing
    too_big = gw.http.post("/v2/models/fraud/infer", content=b"x" * 2048)
    assert too_big.status_code == 413
    # four requests, and the two rows of the batch as predictions of their own
    wait_until(lambda: len(gw.records()) == 6, "four requests logged")
    assert len(records_with_features(gw)) == 3
    found = [
        orjson.loads(r["features"])
        for r in sorted(gw.records(), key=lambda r: r["request_time"])
        if r["features"]
    ]
    # a value per row of a batch; a request's own value where it has one row (or the pointer
    # names one value)
    assert found[0] == {"x0": [0.5, 1.5], "x1": [-1.0, 0.0], "x2": [2.0, -2.0],
                        "x3": [3.5, 9.0], "channel": "web"}  # fmt: skip
    assert found[1] == {"x0": 0.25, "x1": 0.5, "x2": 0.75, "x3": 1.0, "channel": None}
    # a body that is not JSON: every feature missing, the request still logged and answered
    assert found[2] == dict.fromkeys(("x0", "x1", "x2", "x3", "channel"))


@pytest.mark.slow
def test_a_shifted_feature_shows_in_the_cli_admin_report_and_metrics(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # seed 20261206: 2,000 training rows; 300 live requests (420 rows) with x0 moved by 1 sd
    rng = np.random.default_rng(SEED)
    train = training(rng)
    csv_path = tmp_path / "train.csv"
    write_training_csv(csv_path, train)
    gw = gateway([monitored_route(upstreams["a"].url)])
    config = str(gw.config_path)
    out = run_cli(
        capsys,
        "reference",
        "build",
        "--config",
        config,
        "--route",
        "fraud",
        "--from",
        str(csv_path),
    )
    assert "stored for route fraud, variant *, model version *" in out
    sent = send_traffic(gw.url, rng, 300, shift=1.0)
    wait_until(lambda: len(records_with_features(gw)) == 300, "every request logged")

    found = json.loads(run_cli(capsys, "drift", "--config", config, "--format", "json"))
    by_name = {e["feature"]: e for e in found}
    assert set(by_name) == {"x0", "x1", "x2", "x3", "channel", "score"}
    for entry in found:
        assert {"variant", "model_version", "feature", "psi", "ks_statistic", "ks_p_value",
                "missing_ratio", "mean", "variance"} <= set(entry)  # fmt: skip
        assert (entry["variant"], entry["model_version"], entry["window"]) == ("a", "1", "5m")
    x0 = by_name["x0"]
    expected = stats.ks_2samp(train["x0"], sent[:, 0])
    assert x0["count"] == len(sent) == 420
    assert x0["ks_statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert x0["ks_p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert x0["psi"] > 0.5
    assert x0["mean"] == pytest.approx(float(np.mean(sent[:, 0])), rel=1e-12)
    assert x0["variance"] == pytest.approx(float(np.var(sent[:, 0], ddof=1)), rel=1e-12)
    for name in ("x1", "x2", "x3"):
        assert by_name[name]["psi"] < 0.1, by_name[name]
        assert by_name[name]["missing_ratio"] == 0
    # every tenth request names no channel (a value per request, where x has one per row)
    assert by_name["channel"]["count"] == 300
    assert by_name["channel"]["missing_ratio"] == pytest.approx(30 / 300)
    assert by_name["channel"]["chi2_p_value"] > 1e-3
    assert by_name["score"]["count"] == 420 and by_name["score"]["missing_ratio"] == 0
    table = run_cli(capsys, "drift", "--config", config)
    assert table.splitlines()[0].split()[:5] == ["ROUTE", "VARIANT", "VERSION", "FEATURE", "COUNT"]
    assert any(line.split()[3] == "x0" for line in table.splitlines()[1:])

    # the same figures from the control plane, the report and the metrics
    now = gw.http.get("/admin/drift").json()
    assert {e["feature"]: e["psi"] for e in now["statistics"]} == {
        e["feature"]: e["psi"] for e in found
    }

    def exported() -> float | None:
        text = gw.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith("model_gateway_feature_drift{") and 'feature="x0"' in line \
                    and 'method="psi"' in line:  # fmt: skip
                return float(line.rsplit(" ", 1)[1])
        return None

    wait_until(lambda: exported() == pytest.approx(x0["psi"], rel=1e-9), "the gauge updated")
    report = gw.http.get("/admin/report", params={"route": "fraud"}).json()
    windows = {(e["window"], e["feature"]): e for e in report["monitoring"]["statistics"]}
    assert windows[("5m", "x0")]["psi"] == pytest.approx(x0["psi"], rel=1e-9)
    assert windows[("1h", "x0")]["count"] == 420


@pytest.mark.slow
def test_references_pinned_from_the_log_listed_replaced_and_deleted(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(SEED + 1)
    gw = gateway([monitored_route(upstreams["a"].url)], admin={"token": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    assert gw.http.get("/admin/references").status_code == 401
    send_traffic(gw.url, rng, 100, shift=0.0)
    wait_until(lambda: len(records_with_features(gw)) == 100, "the first hundred logged")
    times = [r["request_time"] for r in gw.records()]
    since, until = min(times) - 0.001, max(times) + 0.001  # RFC 3339 keeps microseconds

    def rfc(t: float) -> str:
        from model_gateway.control_answers import format_rfc3339

        return format_rfc3339(t)

    pinned = gw.http.post(
        "/admin/references",
        json={"route": "fraud", "since": rfc(since), "until": rfc(until)},
        headers=auth,
    )
    assert pinned.status_code == 201, pinned.text
    [reference] = pinned.json()["references"]
    assert (reference["variant"], reference["model_version"]) == ("a", "1")
    assert reference["source"]["log"]["requests"] == 100
    assert reference["features"]["x0"]["count"] == 140  # ten batches of five rows
    # the same window from the command line makes a second, newer one; list shows both
    out = run_cli(
        capsys, "reference", "build", "--config", str(gw.config_path), "--route", "fraud",
        "--from-log", "--since", rfc(since), "--until", rfc(until),
    )  # fmt: skip
    assert "variant a, model version 1" in out
    listed = json.loads(
        run_cli(capsys, "reference", "list", "--config", str(gw.config_path), "--format", "json")
    )
    assert len(listed) == 2 and listed[1]["reference_id"] == reference["reference_id"]
    # the same traffic again: no drift against the pinned window
    send_traffic(gw.url, rng, 100, shift=0.0)
    wait_until(lambda: len(records_with_features(gw)) == 200, "the second hundred logged")
    now = gw.http.get("/admin/drift", headers=auth).json()["statistics"]
    x0 = next(e for e in now if e["feature"] == "x0")
    assert x0["reference_id"] == listed[0]["reference_id"]  # the newest applies
    assert x0["psi"] < 0.2
    deleted = gw.http.delete(f"/admin/references/{listed[0]['reference_id']}", headers=auth)
    assert deleted.status_code == 204
    assert (
        gw.http.delete(f"/admin/references/{listed[0]['reference_id']}", headers=auth).status_code
        == 404
    )
    now = gw.http.get("/admin/drift", headers=auth).json()["statistics"]
    assert next(e for e in now if e["feature"] == "x0")["reference_id"] == reference["reference_id"]
    # what is wrong is said
    early = gw.http.get("/admin/drift", params={"until": "0001-01-01T00:00:00Z"}, headers=auth)
    assert early.status_code == 400 and "before" in early.json()["error"]["message"]
    bad = gw.http.post("/admin/references", json={"route": "fraud", "since": "yesterday"},
                       headers=auth)  # fmt: skip
    assert bad.status_code == 400 and "RFC 3339" in bad.json()["error"]["message"]
    empty = gw.http.post(
        "/admin/references",
        json={"route": "fraud", "since": "2001-01-01T00:00:00Z", "until": "2001-01-02T00:00:00Z"},
        headers=auth,
    )
    assert empty.status_code == 400 and "no monitored requests" in empty.json()["error"]["message"]
    assert gw.http.post("/admin/references", content=b"\x00\xff", headers=auth).status_code == 400


def test_a_parquet_file_gives_the_reference_a_csv_gives(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(SEED + 2)
    train = training(rng, 500)
    train["x1"][7] = None  # a blank cell: missing
    write_training_csv(tmp_path / "train.csv", train)
    pq.write_table(pa.table(train), tmp_path / "train.parquet")
    gw = gateway([monitored_route(upstreams["a"].url)])
    config = str(gw.config_path)
    for name in ("train.csv", "train.parquet"):
        run_cli(capsys, "reference", "build", "--config", config, "--route", "fraud",
                "--from", str(tmp_path / name), "--variant", "a")  # fmt: skip
    parquet, from_csv = gw.http.get("/admin/references").json()["references"]
    assert parquet["source"]["file"] == "train.parquet" and parquet["variant"] == "a"
    assert parquet["features"] == from_csv["features"]
    assert from_csv["features"]["x1"]["missing_ratio"] == pytest.approx(1 / 500)
    assert from_csv["source"]["rows"] == 500 and len(from_csv["source"]["sha256"]) == 64
    # a file without a monitored column is refused, saying which
    del train["x3"]
    write_training_csv(tmp_path / "short.csv", train)
    assert main(["reference", "build", "--config", config, "--route", "fraud",
                 "--from", str(tmp_path / "short.csv")]) == 1  # fmt: skip
    assert "no column for x3" in capsys.readouterr().err


@pytest.mark.slow
def test_two_replicas_on_postgresql_report_the_fleets_figures(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    schema = f"mg_drift_{uuid.uuid4().hex[:12]}"
    url = f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={schema}"
    replicas: list[RunningGateway] = []
    try:
        for n in range(2):
            config = tmp_path / f"replica{n}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {"storage": {"url": url}, "routes": [monitored_route(upstreams["a"].url)]}
                )
            )
            replicas.append(RunningGateway(config, tmp_path / "unused.db"))
        rng = np.random.default_rng(SEED + 3)
        for gw in replicas:
            send_traffic(gw.url, rng, 50, shift=0.0)

        def counts() -> list[int | None]:
            out = []
            for gw in replicas:
                found = gw.http.get("/admin/drift").json()["statistics"]
                out.append(next((e["count"] for e in found if e["feature"] == "x0"), None))
            return out

        wait_until(lambda: counts() == [140, 140], "both replicas see every request")
        one, two = (gw.http.get("/admin/drift").json()["statistics"] for gw in replicas)
        assert [{k: v for k, v in e.items()} for e in one] == two
    finally:
        for gw in replicas:
            gw.stop()
        drop_schema(schema)


def test_the_shipped_drift_example_runs(
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_URL", upstreams["a"].url)
    monkeypatch.setenv("STORAGE_URL", f"sqlite:///{tmp_path / 'drift.db'}")
    loaded = load_config(EXAMPLE)
    [route] = loaded.config.routes
    assert route.monitoring is not None
    assert [f.name for f in route.monitoring.features] == ["x0", "x1", "x2", "x3"]
    gw = RunningGateway(EXAMPLE, tmp_path / "drift.db")
    try:
        rng = np.random.default_rng(SEED + 4)
        with httpx.Client(base_url=gw.url) as client:
            for _ in range(40):
                body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "data": rng.normal(size=4).round(3).tolist()}]}  # fmt: skip
                assert client.post(route.path + "/infer", json=body).status_code == 200
        wait_until(lambda: len(records_with_features(gw)) == 40, "the example's requests logged")
        found = json.loads(run_cli(capsys, "drift", "--config", str(EXAMPLE), "--format", "json"))
        assert {e["feature"] for e in found} == {"x0", "x1", "x2", "x3", "score"}
        assert all(e["count"] == 40 and e["missing_ratio"] == 0 for e in found)
    finally:
        gw.stop()


# --- any request body ---------------------------------------------------------------------

READER = FeatureReader(
    feature_spec(
        MonitoringConfig.model_validate(
            {
                "features": [
                    *FEATURES,
                    CHANNEL,
                    {"name": "amounts", "pointer": "/instances/*/amount"},
                    {"name": "whole", "input": "x"},
                ]
            }
        )
    )
)
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["\x00", "\ud800", "\x1b[31m", "x" * 100_000]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(TEXT, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),  # "\ud800" escapes too
        st.fixed_dictionaries(
            {"inputs": st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["x", "y"]), "shape": JSON_VALUES, "data": JSON_VALUES}
            ), max_size=3)}
        ).map(lambda v: json.dumps(v).encode()),
    ),
    st.integers(min_value=-5, max_value=400),
)  # fmt: skip
def test_any_body_gives_features_and_never_an_error(body: bytes, binary_header: int) -> None:
    read = READER.read(body, binary_header)
    assert read is not None
    text = features_text(read) or ""
    # NUL and unpaired surrogates escaped: every store keeps the text
    assert "\x00" not in text and text.encode("utf-8")
    found = orjson.loads(text)
    assert set(found) == {"x0", "x1", "x2", "x3", "channel", "amounts", "whole"}
    rows = {k: v if isinstance(v, list) else [v] for k, v in found.items()}
    for values in rows.values():
        assert 1 <= len(values) <= MAX_FEATURE_ROWS
    for name in ("x0", "x1", "x2", "x3", "amounts", "whole"):
        assert all(v is None or isinstance(v, float) for v in rows[name])
    assert all(v is None or (isinstance(v, str) and len(v) <= 128) for v in rows["channel"])


def test_a_big_batch_keeps_its_first_rows() -> None:
    rows = np.arange(4 * 3000, dtype=float).reshape(3000, 4)
    found = READER.read(orjson.dumps(infer(rows, "web")), 0) or {}
    assert len(found["x0"]) == MAX_FEATURE_ROWS and found["x0"][:2] == [0.0, 4.0]
    nested = {"inputs": [{"name": "x", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}
    assert (READER.read(orjson.dumps(nested), 0) or {})["x2"] == [3.0, 7.0]
    instances = {"instances": [{"amount": 3}, {"amount": "no"}, {}]}
    assert (READER.read(orjson.dumps(instances), 0) or {})["amounts"] == [3.0, None, None]


@pytest.mark.parametrize(
    ("monitoring", "message"),
    [
        ({"features": [{"name": "a"}]}, "give either pointer or input"),
        ({"features": [{"name": "a", "pointer": "/a", "input": "x"}]}, "give either pointer"),
        ({"features": [{"name": "a", "pointer": "a"}]}, "JSON pointer"),
        ({"features": [{"name": "a", "pointer": "/a", "column": 1}]}, "column: only with input"),
        ({"features": [{"name": "score", "pointer": "/a"}]}, "the score's name"),
        ({"features": [{"name": "a", "pointer": "/a"}] * 2}, "named twice"),
        ({"features": [{"name": "a", "pointer": "/a", "range": [3, 1]}]}, "low < high"),
        ({"features": [{"name": "a", "pointer": "/a"}], "windows": ["5 minutes"]}, "duration"),
        ({"features": [], "score": False}, "monitors nothing"),
    ],
)
def test_a_wrong_monitoring_section_is_refused_saying_why(
    tmp_path: Path, monitoring: dict[str, Any], message: str
) -> None:
    from model_gateway.errors import ConfigError

    route = monitored_route("http://127.0.0.1:1")
    route["monitoring"] = monitoring
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"routes": [route]}))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert "routes[0].monitoring" in str(refused.value)
    assert message in str(refused.value)


def test_a_window_of_more_records_than_a_look_reads_is_a_uniform_sample(store_url: str) -> None:
    """4,000 requests (every tenth a batch of three rows) in a window read at most 1,000:
    about a quarter of them, spread over the whole window, a batch's rows with their
    request, the same ones each time (on both stores)."""
    from model_gateway.monitoring import window_rows

    records = []
    for i in range(4000):
        one = record(i, route_name="fraud", t=10_000.0)
        one.features = {"x0": float(i)}
        if i % 10 == 0:
            one.batch_size, one.batch_rows = 3, [("1", 0.5)] * 3
        records.append(one)

    async def work(store: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        await store.write_predictions([row for r in records for row in r.as_rows()])
        total = await store.count_monitored("fraud", 0.0, 1e12)
        first = await window_rows(store, "fraud", 0.0, 1e12, 1000)
        again = await window_rows(store, "fraud", 0.0, 1e12, 1000)
        return first, again, total

    first, again, total = asyncio.run(with_store(store_url, work))
    assert total == 4000 + 400 * 3
    assert 850 <= len(first) <= 1150, len(first)
    assert first == again
    sent = sorted(orjson.loads(r["features"])["x0"] for r in first if r["features"])
    assert sent[0] < 200 and sent[-1] > 3800  # from the whole window, not its end
    batches = [r for r in first if r["batch_size"] == 3]
    rows_of_batches = [r for r in first if r["features"] is None]
    assert len(rows_of_batches) == 3 * len(batches)


def test_stale_series_are_cleared_and_the_main_version_shows(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """A feature no longer monitored, after a reload, shows NaN with a count of 0 (no alert
    on figures of the past); the requests a model server failed (logged under the configured
    version, the others under the version it reports) do not take the gauge over."""
    route = monitored_route(upstreams["a"].url)
    route["variants"][0]["model_version"] = "v1"  # the server reports "1"
    gw = in_process([route])
    for _ in range(30):
        assert (
            gw.http.post("/v2/models/fraud/infer", json=infer(np.ones((1, 4)), "web")).status_code
            == 200
        )
    for _ in range(5):
        assert gw.http.post("/v2/models/fraud/infer", content=b"[").status_code == 400
    wait_until(lambda: len(gw.records()) == 35, "every request logged")

    def gauge(name: str, **labels: str) -> float | None:
        metrics = gw.app.metrics.registry
        return metrics.get_sample_value(name, {"route": "fraud", "variant": "a", **labels})

    def look() -> None:
        gw.http.get("/admin/report")  # the loop moves on with each call
        gw.run(gw.app.monitor.look(every=True))

    look()
    statistic = "model_gateway_feature_statistic"
    assert gauge(statistic, feature="x1", statistic="count", window="5m") == 30
    versions = {e["model_version"] for e in gw.app.monitor.latest["fraud"]}
    assert versions == {"1", "v1"}
    route["monitoring"]["features"] = [FEATURES[0]]
    gw.config_path.write_text(yaml.safe_dump({**yaml.safe_load(gw.config_path.read_text()),
                                              "routes": [route]}))  # fmt: skip
    assert gw.http.post("/admin/reload").json()["status"] == "reloaded"
    look()
    assert gauge(statistic, feature="x0", statistic="count", window="5m") == 30
    assert gauge(statistic, feature="x1", statistic="count", window="5m") == 0
    assert np.isnan(gauge(statistic, feature="x1", statistic="mean", window="5m") or 0.0)
    assert np.isnan(gauge("model_gateway_feature_drift", feature="x1", method="psi") or 0.0)


def test_categories_are_spelled_alike_in_a_file_and_a_request(tmp_path: Path) -> None:
    from model_gateway.monitoring import read_columns

    route_config = load_config_from(tmp_path, monitored_route("http://127.0.0.1:1"))
    path = tmp_path / "train.csv"
    # pandas writes True for a bool, 1.0 for a whole number in a column with blanks
    write_training_csv(path, {"channel": ["True", "1.0", "web", "", "x" * 300],
                              **{f"x{i}": ["1"] * 5 for i in range(4)}})  # fmt: skip
    from_file = read_columns(path, route_config)["channel"]
    body = {"inputs": [{"name": "x", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    live = []
    for value in (True, 1, "web", None, "x" * 300):
        doc = {**body, "parameters": {"channel": value}}
        live.append((READER.read(orjson.dumps(doc), 0) or {})["channel"])
    assert from_file == live == ["true", "1", "web", None, "x" * 128]


def load_config_from(tmp_path: Path, route: dict[str, Any]) -> Any:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"routes": [route]}))
    return load_config(path).config.routes[0]


def test_a_pointer_with_a_digit_that_is_not_ascii_is_a_key(tmp_path: Path) -> None:
    # "²" is a digit to str.isdigit, and no list index: a key like any other
    route = monitored_route("http://127.0.0.1:1")
    route["monitoring"]["features"] = [{"name": "a", "pointer": "/inputs/²"}]
    route["evaluation"]["score"] = "/outputs/²"
    loaded = load_config_from(tmp_path, route)
    assert loaded.monitoring is not None
    reader = FeatureReader(feature_spec(loaded.monitoring))
    body = orjson.dumps({"inputs": {"²": 7}})
    assert reader.read(body, 0) == {"a": 7.0}
