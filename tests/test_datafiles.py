"""export, sample and feedback import against the store a real gateway wrote."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from model_gateway.cli import main

from .conftest import GatewayFactory, RunningGateway, Upstream
from .test_feedback import fraud_gateway, predict, wait_for_label

WINDOW = ["--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01T00:00:00Z"]


@pytest.fixture
def logged(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> tuple[RunningGateway, dict[str, str]]:
    """A stopped gateway whose store holds 30 predictions, 20 of them labelled (5 twice)."""
    gw = fraud_gateway(gateway, upstreams)
    labels: dict[str, str] = {}
    ids = [predict(gw, i, f"req-{i}").headers["x-prediction-id"] for i in range(30)]
    wait_for_label(gw, ids[-1], None)
    first = [{"prediction_id": pid, "label": i % 2} for i, pid in enumerate(ids[:20])]
    assert httpx.post(f"{gw.url}/feedback", json=first).json()["accepted"] == 20
    again = [{"prediction_id": pid, "label": 1} for pid in ids[:5]]
    assert httpx.post(f"{gw.url}/feedback", json=again).json()["accepted"] == 5
    labels = {f["prediction_id"]: str(f["label"]) for f in first + again}
    gw.stop()
    return gw, {pid: labels.get(pid, "") for pid in ids}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_joins_predictions_with_their_latest_label(
    logged: tuple[RunningGateway, dict[str, str]], tmp_path: Path, fmt: str
) -> None:
    gw, labels = logged
    out = tmp_path / f"export.{fmt}"
    assert (
        main(
            [
                "export",
                "--config",
                str(gw.config_path),
                "--route",
                "fraud",
                *WINDOW,
                "--format",
                fmt,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    if fmt == "csv":
        with out.open() as handle:
            rows = list(csv.DictReader(handle))
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = pq.read_table(out).to_pylist()
    assert len(rows) == 30
    assert [r["prediction_id"] for r in rows] == sorted(labels)
    for row in rows:
        assert (row["label"] or "") == labels[row["prediction_id"]]
        assert row["route"] == "fraud" and row["variant"] in ("a", "b")
        assert str(row["request_time"]).endswith("Z")
        assert row["predicted"] in ("0", "1")
    assert sum(1 for r in rows if r["label"]) == 20


def test_sample_is_reproducible_and_ready_for_labelling(
    logged: tuple[RunningGateway, dict[str, str]], tmp_path: Path
) -> None:
    gw, labels = logged
    files = []
    for name, seed in (("one", 3), ("two", 3), ("other", 4)):
        out = tmp_path / f"{name}.csv"
        assert (
            main(
                [
                    "sample",
                    "--config",
                    str(gw.config_path),
                    *WINDOW,
                    "--n",
                    "8",
                    "--seed",
                    str(seed),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        files.append(out.read_text())
    assert files[0] == files[1]
    assert files[0] != files[2]
    rows = list(csv.DictReader(files[0].splitlines()))
    assert len(rows) == 8 and len({r["prediction_id"] for r in rows}) == 8
    assert all(r["label"] == "" and r["prediction_id"] in labels for r in rows)


def test_feedback_import_loads_labels_back(
    logged: tuple[RunningGateway, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1. A sample is drawn and three rows labelled by hand, as pandas writes them (1.0 and
       0.0) and as people type them (true); one more row names no prediction, and one holds
       a label this binary route does not have.
    2. `feedback import` keeps the three as the route's labels 1 and 0, names each bad line
       with its reason, joins the three at once, and exits 1: rows were rejected.
    """
    gw, _ = logged
    sample = tmp_path / "sample.csv"
    assert (
        main(
            [
                "sample",
                "--config",
                str(gw.config_path),
                *WINDOW,
                "--n",
                "10",
                "--seed",
                "1",
                "--out",
                str(sample),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(sample.read_text().splitlines()))
    for row, label in zip(rows[:3], ("1.0", "0.0", " TRUE"), strict=True):
        row["label"] = label
    rows.append({**rows[3], "prediction_id": "", "request_id": "", "label": "1"})
    rows.append({**rows[4], "label": "yes"})
    with sample.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    assert (
        main(
            [
                "feedback",
                "import",
                str(sample),
                "--config",
                str(gw.config_path),
                "--source",
                "analysts",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "3 labels imported (3 joined" in err and "2 rejected" in err
    assert f"{sample}:12: prediction_id or request_id is required" in err
    assert f"{sample}:13: label 'yes' is neither 1 nor 0" in err
    db = sqlite3.connect(gw.db_path)
    joined = dict(
        db.execute(
            "SELECT joined_prediction_id, label FROM feedback WHERE source = 'analysts'"
        ).fetchall()
    )
    db.close()
    assert joined == {
        rows[0]["prediction_id"]: "1",
        rows[1]["prediction_id"]: "0",
        rows[2]["prediction_id"]: "1",
    }
