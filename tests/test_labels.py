"""Labels read one way, whoever wrote them: a JSON client, a person, or pandas.

``1``, ``1.0``, ``"1"``, ``"1.0"``, ``" 1 "``, ``true`` and ``"TRUE"`` are one label, and a
label a route's task does not have is refused with its reason rather than counted as a
negative. Checked through a real gateway, `/feedback` and `feedback import`, against the
precision scikit-learn computes from the true labels.
"""

from __future__ import annotations

import csv
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sklearn.metrics as sk

from model_gateway.cli import main
from model_gateway.records import canonical_label

from .conftest import InProcessFactory, Upstream
from .test_feedback import fraud_gateway, predict, wait_for_label


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (1, "1"),
        (1.0, "1"),
        ("1", "1"),
        ("1.0", "1"),
        (" 1 ", "1"),
        ("+1", "1"),
        ("1e0", "1"),
        (True, "1"),
        ("true", "1"),
        ("TRUE", "1"),
        (0, "0"),
        (0.0, "0"),
        ("0.0", "0"),
        ("-0", "0"),
        (False, "0"),
        ("False", "0"),
        (2.5, "2.5"),
        ("2.50", "2.5"),
        ("12345678901234567890", "12345678901234567890"),
        ("cat", "cat"),
        ("  cat ", "cat"),
        ("yes", "yes"),
        ("", None),
        ("   ", None),
        (float("nan"), None),
        (float("inf"), None),
        ("1e999", None),
        ([1], None),
        (None, None),
    ],
)
def test_one_spelling_per_label(value: Any, label: str | None) -> None:
    assert canonical_label(value) == label


def test_feedback_reads_every_spelling_of_a_binary_label_and_refuses_other_labels(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """On a binary route (positive label 1), every spelling of 1 and 0 is stored as 1 or 0;
    ``"yes"``, ``""`` and ``2`` are refused, each with its reason; an item naming a
    prediction not stored yet is kept, and said to be waiting."""
    gw = fraud_gateway(in_process, upstreams)
    ids = [predict(gw, i).headers["x-prediction-id"] for i in range(12)]
    wait_for_label(gw, ids[-1], None)
    spellings: list[Any] = [True, "true", "TRUE", " 1", "1.0", 1.0, False, "false", "0.0", 0]
    items: list[dict[str, Any]] = [
        {"prediction_id": pid, "label": value} for pid, value in zip(ids, spellings, strict=False)
    ]
    items += [
        {"prediction_id": ids[10], "label": "yes"},
        {"prediction_id": ids[11], "label": ""},
        {"prediction_id": ids[11], "label": 2},
        {"prediction_id": "not-logged-yet", "label": 1},
    ]
    answer = gw.http.post("/feedback", json=items).json()
    assert answer["accepted"] == 11
    assert answer["waiting"] == 1
    reasons = {e["index"]: e["reason"] for e in answer["errors"]}
    assert sorted(reasons) == [10, 11, 12]
    assert reasons[10].startswith("label 'yes' is neither 1 nor 0")
    assert reasons[10].endswith("(route fraud)")
    assert reasons[11] == "label must be a non-empty string, a finite number or a boolean"
    assert reasons[12].startswith("label '2' is neither 1 nor 0")
    for pid, value in zip(ids, spellings, strict=False):
        wait_for_label(gw, pid, "1" if canonical_label(value) == "1" else "0")


def test_a_csv_pandas_wrote_gives_the_precision_of_the_true_labels(
    in_process: InProcessFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pandas writes a label column as 1.0 and 0.0 once one cell is blank. Imported, those
    are the labels 1 and 0: each variant's precision and recall equal scikit-learn's on the
    true labels (stored as written, every 1.0 counted as a negative, and precision fell from
    0.9258 to 0.8747 in the run that found it)."""
    gw = fraud_gateway(in_process, upstreams)
    rng = random.Random(11)
    truth: dict[str, tuple[str, int, int]] = {}
    for _ in range(120):
        r = predict(gw, rng.randrange(1000))
        predicted = r.json()["outputs"][1]["data"][0]
        truth[r.headers["x-prediction-id"]] = (
            r.headers["x-model-variant"],
            predicted,
            predicted if rng.random() < 0.8 else 1 - predicted,
        )
    wait_for_label(gw, next(reversed(truth)), None)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prediction_id", "label"])
        for n, (pid, (_, _, actual)) in enumerate(truth.items()):
            writer.writerow([pid, "" if n == 0 else f"{float(actual)}"])  # as pandas writes
    capsys.readouterr()
    config = str(gw.config_path)
    assert main(["feedback", "import", str(labels), "--config", config]) == 0
    assert "119 labels imported" in capsys.readouterr().err
    report = gw.http.get("/admin/report", params={"route": "fraud"}).json()
    for variant in ("a", "b"):
        rows = [
            (p, y) for n, (pid, (v, p, y)) in enumerate(truth.items()) if v == variant and n > 0
        ]
        got = report["variants"][variant]
        y_true, y_pred = [y for _, y in rows], [p for p, _ in rows]
        assert got["labelled"] == len(rows)
        assert got["precision"]["value"] == pytest.approx(
            sk.precision_score(y_true, y_pred), abs=1e-9
        )
        assert got["recall"]["value"] == pytest.approx(sk.recall_score(y_true, y_pred), abs=1e-9)
    db = sqlite3.connect(gw.db_path)
    assert {r[0] for r in db.execute("SELECT DISTINCT label FROM feedback")} == {"0", "1"}
    db.close()


def test_feedback_import_refuses_a_file_without_a_label_column(
    in_process: InProcessFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = fraud_gateway(in_process, upstreams)
    gw.stop()
    for header, problem in (
        ("prediction_id,labels", "no label column (columns: labels, prediction_id)"),
        ("id,label", "no prediction_id or request_id column"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"{header}\nx,1\n")
        capsys.readouterr()
        assert main(["feedback", "import", str(bad), "--config", str(gw.config_path)]) == 1
        assert capsys.readouterr().err.strip() == f"{bad}: {problem}"
