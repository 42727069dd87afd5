"""Drift statistics against independent references (scipy, the PSI formula written out here,
the normal distribution's theory), and seeded simulations of a day of traffic run through
the shipped alert rules with promtool: a stationary day raises nothing, a score whose
spread grows fires the variance alert and not the mean's, a feature that goes missing
fires the missing-value alert, a drifted one the drift alert, a quiet hour nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from model_gateway.config import GatewayConfig, RouteConfig
from model_gateway.drift import MIN_VALUES, REFERENCE_SAMPLE, compare, summarize
from model_gateway.monitoring import reference_row, summaries_of, window_statistics

RULES = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yml"
SEED = 20261206
FEATURES = ("x0", "x1", "x2", "x3")


def monitored_route(**monitoring: Any) -> RouteConfig:
    config = GatewayConfig.model_validate(
        {
            "routes": [
                {
                    "name": "fraud",
                    "path": "/v2/models/fraud",
                    "evaluation": {"score": "/outputs/0/data/0"},
                    "monitoring": {
                        "features": [
                            {"name": n, "input": "x", "column": i, "range": [-5, 5]}
                            for i, n in enumerate(FEATURES)
                        ],
                        **monitoring,
                    },
                    "variants": [{"name": "a", "url": "http://127.0.0.1:1", "model_version": "1"}],
                }
            ]
        }
    )
    return config.routes[0]


def rows_of(columns: dict[str, np.ndarray], scores: np.ndarray) -> list[dict[str, Any]]:
    """Log rows as the store gives them: one request per row of ``columns``, NaN missing."""
    out = []
    for i in range(len(scores)):
        features = {n: [None if np.isnan(columns[n][i]) else float(columns[n][i])] for n in columns}
        out.append(
            {
                "variant": "a",
                "model_version": "1",
                "status": 200,
                "score": None if np.isnan(scores[i]) else float(scores[i]),
                "features": orjson.dumps(features).decode(),
                "batch_size": None,
            }
        )
    return out


def reference_of(route: RouteConfig, columns: dict[str, Any]) -> dict[str, Any]:
    as_lists = {n: [None if np.isnan(v) else float(v) for v in c] for n, c in columns.items()}
    summaries = summaries_of(route, as_lists)
    row = reference_row(route.name, "*", "*", summaries, {"test": True})
    return {**row, "summaries": summaries}


def by_feature(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["feature"]: e for e in entries}


def hand_psi(reference: np.ndarray, window: np.ndarray) -> float:
    """PSI written out: ten bins at the reference's deciles, shares floored at 1e-4."""
    edges = np.concatenate(([-np.inf], np.quantile(reference, np.arange(1, 10) / 10), [np.inf]))
    p = np.histogram(reference, edges)[0] / len(reference)
    q = np.histogram(window, edges)[0] / len(window)
    p, q = np.maximum(p, 1e-4), np.maximum(q, 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def test_a_half_sd_shift_gives_the_theoretical_psi_and_scipys_ks() -> None:
    # seed 20261206: 10,000 reference rows (all kept as the KS sample), 10,000 live rows
    rng = np.random.default_rng(SEED)
    route = monitored_route()
    n = REFERENCE_SAMPLE
    reference = {f: rng.normal(size=n) for f in FEATURES}
    reference_scores = rng.beta(2, 5, size=n)
    live = {f: rng.normal(size=n) for f in FEATURES}
    live["x0"] = live["x0"] + 0.5
    live_scores = rng.beta(2, 5, size=n)
    ref = reference_of(route, {**reference, "score": reference_scores})
    found = by_feature(window_statistics(route, rows_of(live, live_scores), [ref], "5m"))

    # PSI of N(0.5, 1) against N(0, 1) at N(0, 1)'s deciles, from the normal CDF
    z = np.concatenate(([-np.inf], stats.norm.ppf(np.arange(1, 10) / 10), [np.inf]))
    shares = np.diff(stats.norm.cdf(z - 0.5))
    theory = float(np.sum((shares - 0.1) * np.log(shares / 0.1)))
    assert theory == pytest.approx(0.238, abs=5e-4)
    assert found["x0"]["psi"] >= 0.2
    # sampling noise at 10,000 a side is about 0.015: within 3 of it (0.270 with this seed)
    assert found["x0"]["psi"] == pytest.approx(theory, abs=0.045)
    assert found["x0"]["psi"] == pytest.approx(hand_psi(reference["x0"], live["x0"]), rel=1e-9)
    expected = stats.ks_2samp(reference["x0"], live["x0"])
    assert found["x0"]["ks_statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert found["x0"]["ks_p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    for other in ("x1", "x2", "x3", "score"):
        assert found[other]["psi"] < 0.1, other
        assert found[other]["psi"] == pytest.approx(
            hand_psi(
                reference_scores if other == "score" else reference[other],
                live_scores if other == "score" else live[other],
            ),
            rel=1e-9,
        )
        assert found[other]["ks_p_value"] > 1e-3
    # mean, variance and the ratios, against numpy's
    assert found["x0"]["mean"] == pytest.approx(float(np.mean(live["x0"])), rel=1e-12)
    assert found["x0"]["variance"] == pytest.approx(float(np.var(live["x0"], ddof=1)), rel=1e-12)
    ratio = np.var(live["x0"], ddof=1) / np.var(reference["x0"], ddof=1)
    assert found["x0"]["variance_ratio"] == pytest.approx(float(ratio), rel=1e-12)
    shift = (np.mean(live["x0"]) - np.mean(reference["x0"])) / np.std(reference["x0"], ddof=1)
    assert found["x0"]["mean_shift"] == pytest.approx(float(shift), rel=1e-9)


def test_the_psi_of_a_half_sd_shift_converges_to_the_theory() -> None:
    # seed 20261208: 200,000 values a side; the theory's 0.2377 within 0.005
    rng = np.random.default_rng(SEED + 2)
    reference = rng.normal(size=200_000)
    found = compare(summarize(list(reference), False), list(rng.normal(size=200_000) + 0.5), False)
    assert found["psi"] == pytest.approx(0.2377, abs=0.005)


def test_ten_percent_missing_shows_as_a_missing_ratio_of_a_tenth() -> None:
    # seed 20261207: each value of x2 missing with probability 0.1, 5,000 requests
    rng = np.random.default_rng(SEED + 1)
    route = monitored_route()
    reference = {f: rng.normal(size=5000) for f in FEATURES}
    live = {f: rng.normal(size=5000) for f in FEATURES}
    live["x2"][rng.random(5000) < 0.1] = np.nan
    live["x3"][:250] = 7.0  # out of [-5, 5]: 5 %
    ref = reference_of(route, reference)
    found = by_feature(window_statistics(route, rows_of(live, rng.random(5000)), [ref], "5m"))
    assert found["x2"]["missing_ratio"] == pytest.approx(0.10, abs=0.01)
    assert found["x2"]["missing_increase"] == pytest.approx(found["x2"]["missing_ratio"])
    assert found["x1"]["missing_ratio"] == 0
    assert found["x3"]["out_of_range_ratio"] == pytest.approx(0.05)
    assert found["x2"]["count"] == 5000
    # the reference's own missing share is what the increase is measured over
    missing_ref = {**reference, "x2": np.where(rng.random(5000) < 0.1, np.nan, reference["x2"])}
    ref = reference_of(route, missing_ref)
    again = by_feature(window_statistics(route, rows_of(live, rng.random(5000)), [ref], "5m"))
    assert again["x2"]["reference_missing_ratio"] == pytest.approx(0.1, abs=0.015)
    assert abs(again["x2"]["missing_increase"]) < 0.02


def test_a_categorical_feature_against_scipys_chi_square() -> None:
    rng = np.random.default_rng(SEED + 2)
    reference = list(rng.choice(["fr", "de", "us", "uk"], size=4000, p=[0.4, 0.3, 0.2, 0.1]))
    live = list(rng.choice(["fr", "de", "us", "br"], size=2000, p=[0.25, 0.25, 0.25, 0.25]))
    summary = summarize(reference, categorical=True)
    found = compare(summary, live, categorical=True)
    categories = [*summary["shares"], "__other__"]
    observed = np.array(
        [sum(1 for v in live if (v if v in summary["shares"] else "__other__") == c)
         for c in categories],
        dtype=float,
    )  # fmt: skip
    shares = np.array([summary["shares"].get(c, 0.0) for c in categories])
    possible = np.maximum(shares, 1e-4)  # the test needs each category possible
    assert found["chi2_p_value"] == pytest.approx(
        stats.chisquare(observed, possible / possible.sum() * observed.sum()).pvalue, rel=1e-9
    )
    p, q = np.maximum(shares, 1e-4), np.maximum(observed / observed.sum(), 1e-4)
    assert found["psi"] == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-12)
    assert found["psi"] > 0.2  # "br" is new, "uk" gone, the shares moved


def test_a_reference_keeps_a_fixed_sample_of_a_large_file() -> None:
    rng = np.random.default_rng(SEED + 3)
    values = list(rng.normal(size=3 * REFERENCE_SAMPLE))
    one, two = summarize(values, False), summarize(values, False)
    assert len(one["sample"]) == REFERENCE_SAMPLE
    assert one["sample"] == two["sample"]  # one file, one reference
    assert one["count"] == 3 * REFERENCE_SAMPLE
    assert one["edges"] == pytest.approx(list(np.quantile(values, np.arange(1, 10) / 10)))


def test_too_few_values_give_no_drift_figures() -> None:
    summary = summarize(list(np.arange(100.0)), False)
    found = compare(summary, [1.0] * (MIN_VALUES - 1) + [None], False)
    assert found["psi"] is None and found["ks_statistic"] is None
    assert found["missing_ratio"] == pytest.approx(1 / MIN_VALUES)
    assert compare(None, [1.0, 2.0, 3.0] * 10, False)["psi"] is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)), max_size=60),
    st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)), max_size=60),
)
def test_any_values_give_figures_or_none_never_an_error(
    reference: list[float | None], window: list[float | None]
) -> None:
    summary = summarize(reference, False)
    found = compare(summary, window, False, (-1.0, 1.0))
    assert found["count"] == len(window)
    if found["psi"] is not None:
        assert found["psi"] >= 0 or np.isnan(found["psi"])
    if window:
        assert 0 <= found["missing_ratio"] <= 1


# --- a day of traffic through the shipped alert rules -------------------------------------


def simulate_day(
    rng: np.random.Generator,
    route: RouteConfig,
    ref: dict[str, Any],
    per_window: int,
    change: Any = None,
    windows: int = 288,
) -> list[dict[str, dict[str, dict[str, Any]]]]:
    """Each 5-minute look's statistics over a day, of both windows (the last 5 minutes, the
    last hour: the last twelve 5-minute spans); ``change(i, columns, scores)`` alters span
    ``i``'s values (in place) to simulate a fault."""
    spans: list[list[dict[str, Any]]] = []
    out = []
    for i in range(windows):
        columns = {f: rng.normal(size=per_window) for f in FEATURES}
        scores = rng.beta(2, 5, size=per_window)
        if change is not None:
            scores = change(i, columns, scores)
        spans.append(rows_of(columns, scores))
        hour = [row for span in spans[-12:] for row in span]
        out.append(
            {
                "5m": by_feature(window_statistics(route, spans[-1], [ref], "5m")),
                "1h": by_feature(window_statistics(route, hour, [ref], "1h")),
            }
        )
    return out


STATISTICS_EXPORTED = ("count", "psi", "missing_increase", "variance_ratio", "mean_shift")
STATISTICS_EXPORTED += ("out_of_range_ratio",)
DATA_ALERTS = (
    "ModelGatewayFeatureDrift",
    "ModelGatewayFeatureDriftWarning",
    "ModelGatewayScoreVarianceChange",
    "ModelGatewayScoreMeanShift",
    "ModelGatewayFeatureMissingValues",
    "ModelGatewayFeatureOutOfRange",
)


def series_of(
    day: list[dict[str, dict[str, dict[str, Any]]]], skip: int = 0
) -> list[dict[str, str]]:
    """The gauge's series as the monitor exports them, one sample per look (5 minutes),
    after ``skip`` looks without them."""
    out = []
    for window in ("5m", "1h"):
        for feature in (*FEATURES, "score"):
            for statistic in STATISTICS_EXPORTED:
                values = ["_"] * skip
                for look in day:
                    value = look[window][feature][statistic]
                    values.append("_" if value is None else repr(float(value)))
                labels = (
                    f'route="fraud",variant="a",feature="{feature}",statistic="{statistic}",'
                    f'window="{window}"'
                )
                series = f"model_gateway_feature_statistic{{{labels}}}"
                out.append({"series": series, "values": " ".join(values)})
    return out


def run_promtool(
    tmp_path: Path,
    series: list[dict[str, str]],
    checks: list[dict[str, Any]],
    fired: list[dict[str, Any]] = (),  # type: ignore[assignment]
    every: str = "1m",
) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make tools` installs it (Debian package prometheus)"
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": every,
        "tests": [
            {
                "interval": "5m",
                "input_series": series,
                "alert_rule_test": checks,
                "promql_expr_test": list(fired),
            }
        ],
    }
    path = tmp_path / "data_test.yml"
    path.write_text(yaml.safe_dump(test, width=1 << 30))
    done = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def silent(alerts: tuple[str, ...], hours: range) -> list[dict[str, Any]]:
    return [{"eval_time": f"{h}h", "alertname": a, "exp_alerts": []} for h in hours for a in alerts]


def firing(alert: str, at: str, feature: str, severity: str = "warning") -> dict[str, Any]:
    """A check that ``alert`` fires at ``at`` for ``feature`` (and nothing else does)."""
    labels = (
        f'ALERTS{{alertname="{alert}",alertstate="firing",feature="{feature}",route="fraud",'
        f'severity="{severity}",variant="a"}}'
    )
    return {
        "expr": f'ALERTS{{alertname="{alert}",alertstate="firing"}}',
        "eval_time": at,
        "exp_samples": [{"labels": labels, "value": 1}],
    }


@pytest.fixture(scope="module")
def reference() -> tuple[RouteConfig, dict[str, Any]]:
    rng = np.random.default_rng(SEED + 10)
    route = monitored_route()
    columns = {f: rng.normal(size=10_000) for f in FEATURES}
    return route, reference_of(route, {**columns, "score": rng.beta(2, 5, size=10_000)})


@pytest.mark.slow
def test_a_stationary_day_raises_no_alert(
    tmp_path: Path, reference: tuple[RouteConfig, dict[str, Any]]
) -> None:
    # seed 20261217: 24 hours of 5-minute spans of 300 requests (1 a second) from the
    # reference's own distributions: no data alert fires at any hour. The hour's PSI stays
    # far under the warning's 0.1; 5 minutes' (noise about 9 / 300) may not, which is why
    # the drift alerts judge the hour.
    route, ref = reference
    day = simulate_day(np.random.default_rng(SEED + 11), route, ref, 300)
    names = (*FEATURES, "score")
    worst_hour = max(w["1h"][f]["psi"] for w in day[11:] for f in names)
    worst_ratio = max(abs(np.log(w["5m"]["score"]["variance_ratio"])) for w in day)
    worst_shift = max(abs(w["5m"]["score"]["mean_shift"]) for w in day)
    assert worst_hour < 0.02, worst_hour
    assert worst_ratio < np.log(1.5), worst_ratio
    assert worst_shift < 0.5, worst_shift
    run_promtool(tmp_path, series_of(day), silent(DATA_ALERTS, range(1, 25)))


@pytest.mark.slow
def test_a_score_spreading_out_fires_the_variance_alert_not_the_mean_alert(
    tmp_path: Path, reference: tuple[RouteConfig, dict[str, Any]]
) -> None:
    # seed 20261218: a week at the reference's mean, then a day whose scores keep that mean
    # but spread 1.5 times as far from hour 12: the variance alert fires, neither mean
    # alert does (the reference's, nor the 7-day baseline's on the score histogram)
    route, ref = reference
    mean = 2 / 7  # Beta(2, 5)'s

    def spread(i: int, columns: dict[str, np.ndarray], scores: np.ndarray) -> np.ndarray:
        return mean + 1.5 * (scores - mean) if i >= 144 else scores

    day = simulate_day(np.random.default_rng(SEED + 12), route, ref, 300, spread)
    assert all(w["5m"]["score"]["variance_ratio"] > 1.5 for w in day[144:])
    week = 7 * 288
    sums = [300 * mean * (i + 1) for i in range(week)]
    for look in day:
        sums.append(sums[-1] + 300 * look["5m"]["score"]["mean"])
    counts = [300 * (i + 1) for i in range(week + len(day))]
    labels = 'route="fraud",variant="a",model_version="1"'
    histogram = [
        {"series": f"model_gateway_prediction_score_sum{{{labels}}}", "values": _values(sums)},
        {"series": f"model_gateway_prediction_score_count{{{labels}}}", "values": _values(counts)},
    ]
    day_hours = range(169, 169 + 24)
    checks = [
        *silent(("ModelGatewayScoreVarianceChange",), range(169, 169 + 12)),
        *silent(("ModelGatewayScoreMeanShift", "ModelGatewayScoreShift"), day_hours),
    ]
    fired = [firing("ModelGatewayScoreVarianceChange", "181h", "score")]
    # rules evaluated each 5 minutes: a week of them each minute is more than promtool loads
    run_promtool(tmp_path, series_of(day, skip=week) + histogram, checks, fired, "5m")


def _values(values: list[float]) -> str:
    return " ".join(repr(float(v)) for v in values)


@pytest.mark.slow
def test_a_feature_going_missing_or_drifting_fires_its_alert(
    tmp_path: Path, reference: tuple[RouteConfig, dict[str, Any]]
) -> None:
    # seed 20261219, 600 requests each 5 minutes: from hour 6 a tenth of x2 is missing;
    # from hour 12, x0 moves by half a standard deviation
    route, ref = reference
    rng = np.random.default_rng(SEED + 13)

    def faults(i: int, columns: dict[str, np.ndarray], scores: np.ndarray) -> np.ndarray:
        if i >= 72:
            columns["x2"][rng.random(len(scores)) < 0.1] = np.nan
        if i >= 144:
            columns["x0"] += 0.5
        return scores

    day = simulate_day(rng, route, ref, 600, faults, windows=14 * 12)
    assert all(abs(w["5m"]["x2"]["missing_ratio"] - 0.1) < 0.04 for w in day[72:])
    assert all(w["1h"]["x0"]["psi"] >= 0.2 for w in day[156:])
    checks = [
        *silent(("ModelGatewayFeatureMissingValues",), range(1, 6)),
        *silent(("ModelGatewayFeatureDrift", "ModelGatewayFeatureDriftWarning"), range(1, 12)),
    ]
    fired = [
        firing("ModelGatewayFeatureMissingValues", "7h", "x2"),
        firing("ModelGatewayFeatureDrift", "14h", "x0", "critical"),
    ]
    run_promtool(tmp_path, series_of(day), checks, fired)


def test_a_quiet_hour_does_not_page(
    tmp_path: Path, reference: tuple[RouteConfig, dict[str, Any]]
) -> None:
    # 30 requests each 5 minutes (under the 100 and the 1,000 an hour the rules ask for): x0
    # shifted by 2 sd, half of x1 missing, the scores 3 times as large; no alert
    route, ref = reference
    rng = np.random.default_rng(SEED + 14)

    def faults(i: int, columns: dict[str, np.ndarray], scores: np.ndarray) -> np.ndarray:
        columns["x0"] += 2.0
        columns["x1"][::2] = np.nan
        return scores * 3

    day = simulate_day(rng, route, ref, 30, faults, windows=36)
    assert all(w["1h"]["x0"]["psi"] > 0.5 for w in day)
    run_promtool(tmp_path, series_of(day), silent(DATA_ALERTS, range(1, 4)))


def test_a_reference_of_the_other_kind_gives_no_comparison_and_no_error() -> None:
    # a feature changed kind in the file since its reference was built, and the log still
    # holds values of the old kind: counted as missing, never an error
    numeric = summarize([float(i) for i in range(100)], categorical=False)
    categorical = summarize(["a", "b"] * 50, categorical=True)
    as_category = compare(numeric, ["a", "b", 1.5, None] * 10, categorical=True)
    assert as_category["psi"] is None and as_category["missing_ratio"] == pytest.approx(0.5)
    as_number = compare(categorical, [1.0, "a", None, 2.0] * 10, categorical=False)
    assert as_number["psi"] is None and as_number["missing_ratio"] == pytest.approx(0.5)
    assert as_number["mean"] == pytest.approx(1.5)
