"""Quality numbers equal scikit-learn's on the same data, from the pure functions up to the
report a real gateway serves after real traffic and real feedback."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn import metrics as sk

from model_gateway.cli import main
from model_gateway.estimates import binary_quality, multiclass_quality, regression_quality, wilson
from model_gateway.splits import SRM_ALPHA, sample_ratio_over_time

from .conftest import InProcessFactory, Upstream, wait_until
from .test_feedback import fraud_gateway, predict

labels_st = st.lists(
    st.tuples(st.booleans(), st.booleans(), st.floats(0, 1)), min_size=1, max_size=200
)


@settings(max_examples=60, deadline=None)
@given(rows=labels_st)
def test_binary_metrics_equal_sklearn(rows: list[tuple[bool, bool, float]]) -> None:
    truth = ["1" if t else "0" for t, _, _ in rows]
    guess = ["1" if g else "0" for _, g, _ in rows]
    scores = [s for _, _, s in rows]
    q = binary_quality(truth, guess, scores, "1")
    y, p = [int(t) for t in truth], [int(g) for g in guess]
    assert q["precision"].value == pytest.approx(sk.precision_score(y, p, zero_division=0)) or (
        q["precision"].value is None and sum(p) == 0
    )
    if sum(y):
        assert q["recall"].value == pytest.approx(sk.recall_score(y, p))
    if q["f1"].value is not None:
        assert q["f1"].value == pytest.approx(sk.f1_score(y, p))
    assert q["accuracy"].value == pytest.approx(sk.accuracy_score(y, p))
    if 0 < sum(y) < len(y):
        assert q["auc"].value == pytest.approx(sk.roc_auc_score(y, scores))
        assert q["auc"].low <= q["auc"].value <= q["auc"].high
    for name in ("precision", "recall", "accuracy"):
        e = q[name]
        if e.value is not None:
            assert 0 <= e.low <= e.value <= e.high <= 1


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from("abcde")), min_size=1, max_size=150
    )
)
def test_multiclass_macro_metrics_equal_sklearn(pairs: list[tuple[str, str]]) -> None:
    truth, guess = [t for t, _ in pairs], [g for _, g in pairs]
    classes = sorted(set(truth) | set(guess))
    q = multiclass_quality(truth, guess)
    for name, fn in (
        ("precision", sk.precision_score),
        ("recall", sk.recall_score),
        ("f1", sk.f1_score),
    ):
        expected = fn(truth, guess, average="macro", labels=classes, zero_division=0)
        assert q[name].value == pytest.approx(expected), name
    assert q["accuracy"].value == pytest.approx(sk.accuracy_score(truth, guess))


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=2, max_size=100)
)
def test_regression_metrics_equal_sklearn(pairs: list[tuple[float, float]]) -> None:
    actual, predicted = [a for a, _ in pairs], [p for _, p in pairs]
    q = regression_quality(actual, predicted)
    assert q["mae"].value == pytest.approx(sk.mean_absolute_error(actual, predicted), abs=1e-9)
    assert q["rmse"].value == pytest.approx(
        np.sqrt(sk.mean_squared_error(actual, predicted)), abs=1e-9
    )


def test_wilson_interval_and_sample_ratio_mismatch() -> None:
    e = wilson(80, 100)
    assert (
        e.value == 0.8
        and e.low == pytest.approx(0.7111, abs=1e-4)
        and e.high == pytest.approx(0.8666, abs=1e-4)
    )
    assert wilson(0, 0).value is None
    weights = {"a": 90.0, "b": 10.0}

    def split(a: int, b: int) -> dict:
        rows = [{"variant": "a", "assignment": "random"}] * a
        return sample_ratio_over_time(rows + [{"variant": "b", "assignment": "random"}] * b,
                                      {}, weights)  # fmt: skip

    fair = split(905, 95)
    assert fair["mismatch"] is False and fair["p_value"] > 0.05
    skewed = split(800, 200)
    assert skewed["mismatch"] is True and skewed["p_value"] < 1e-10


def test_report_from_a_real_gateway_equals_sklearn(
    in_process: InProcessFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1. 160 predictions through two variants of a real gateway; the client keeps each answer.
    2. Ground truth for 120 of them is posted to /feedback (one label corrected later).
    3. /admin/report and `model-gateway report` give, per variant, the counts and the
       precision, recall, F1, accuracy and AUC that scikit-learn computes from the same data.
    """
    since = time.time() - 1
    gw = fraud_gateway(in_process, upstreams)
    rng = random.Random(7)
    seen: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    feedback = []
    for i in range(160):
        r = predict(gw, rng.randrange(1000))
        variant = r.headers["x-model-variant"]
        seen[variant]["requests"].append(r.headers["x-prediction-id"])
        if i % 4 == 3:
            continue  # unlabelled
        truth = int(rng.random() < 0.4)
        seen[variant]["truth"].append(truth)
        seen[variant]["predicted"].append(r.json()["outputs"][1]["data"][0])
        seen[variant]["score"].append(r.json()["outputs"][0]["data"][0])
        feedback.append({"prediction_id": r.headers["x-prediction-id"], "label": 1 - truth})
    # every answer's record is written (the last labelled one need not be the last written)
    wait_until(lambda: len(gw.records()) == 160, "the 160 records")
    assert gw.http.post("/feedback", json=feedback).json()["accepted"] == 120
    # every label was wrong at first; the corrections supersede them
    corrected = [{**f, "label": 1 - f["label"]} for f in feedback]
    assert gw.http.post("/feedback", json=corrected).json()["accepted"] == 120
    until = time.time() + 1

    def rfc(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"

    report = gw.http.get(
        "/admin/report",
        params={"route": "fraud", "since": rfc(since), "until": rfc(until)},
    ).json()
    assert report["champion"] == "a" and report["task"] == "binary"
    for variant, data in seen.items():
        got = report["variants"][variant]
        y, p, s = data["truth"], data["predicted"], data["score"]
        assert got["requests"] == len(data["requests"])
        assert got["labelled"] == len(y)
        assert got["precision"]["value"] == pytest.approx(sk.precision_score(y, p, zero_division=0))
        assert got["recall"]["value"] == pytest.approx(sk.recall_score(y, p))
        assert got["f1"]["value"] == pytest.approx(sk.f1_score(y, p))
        assert got["accuracy"]["value"] == pytest.approx(sk.accuracy_score(y, p))
        assert got["auc"]["value"] == pytest.approx(sk.roc_auc_score(y, s))
        assert got["error_ratio"]["value"] == 0
        percentiles = got["latency_ms"]  # recorded for every variant, in order
        assert percentiles["p50"] is not None
        assert percentiles["p50"] <= percentiles["p95"] <= percentiles["p99"]
        assert got["model_versions"] == [{"a": "1", "b": "2"}[variant]]
    (comparison,) = report["comparisons"]
    assert comparison["challenger"] == "b"
    by_metric = {d["metric"]: d for d in comparison["fixed_horizon"]}
    for metric in ("precision", "recall", "accuracy", "f1", "auc"):
        d = by_metric[metric]
        expected = (
            report["variants"]["b"][metric]["value"] - report["variants"]["a"][metric]["value"]
        )
        assert d["difference"] == pytest.approx(expected)
        assert d["low"] <= d["difference"] <= d["high"] and 0 <= d["p_value"] <= 1
    split = report["sample_ratio"]
    counts = {v: len(d["requests"]) for v, d in seen.items()}
    assert split["observed"] == counts
    # the split's test is scipy's on the counts the client saw, against the 1:1 weights (its
    # verdict is left to chance: the gateway's draw is not seeded, and a fair split is called
    # a mismatch once in a thousand)
    reference = stats.chisquare([counts["a"], counts["b"]], [80, 80])
    assert split["p_value"] == pytest.approx(reference.pvalue)
    assert split["mismatch"] is bool(reference.pvalue < SRM_ALPHA)

    gw.stop()
    assert (
        main(
            [
                "report",
                "--config",
                str(gw.config_path),
                "--route",
                "fraud",
                "--since",
                rfc(since),
                "--until",
                rfc(until),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["variants"] == report["variants"]


def test_report_rejects_bad_parameters(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = fraud_gateway(in_process, upstreams)
    assert gw.http.get("/admin/report", params={"route": "nope"}).status_code == 400
    for bound in ("since", "until"):
        answer = gw.http.get("/admin/report", params={bound: "soon"})
        assert answer.status_code == 400
        # the message names the parameter that is wrong
        assert answer.json()["error"]["message"].startswith(f"{bound}: 'soon'")
    bad_order = {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
    assert gw.http.get("/admin/report", params=bad_order).status_code == 400
    empty = gw.http.get("/admin/report").json()
    assert empty["variants"]["a"]["requests"] == 0 and empty["variants"]["a"]["labelled"] == 0
