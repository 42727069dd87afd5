"""A route's quality report: :func:`build_report` turns its rows from the store into the report
that ``GET /admin/report``, ``GET /admin/experiments/{id}`` and ``model-gateway report`` show.

Per variant, per arm (variant, served model version) and per shadow: requests, errors,
latency and quality with 95 % intervals (:mod:`.estimates`). Each challenger arm and shadow
against the champion (named by the route's experiment; else its first variant): fixed-horizon
differences, the always-valid tests and decision of :mod:`.experiments`, and for shadows the
paired tests of :mod:`.paired`. The split and the label coverage are checked
(:mod:`.splits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson

from .config import COST_FEATURE_PREFIX, CostAmount, CostsConfig, EvaluationConfig, RouteConfig
from .costs import Costed, costed_report
from .estimates import (
    Difference,
    Estimate,
    binary_quality,
    bootstrap_f1_difference,
    multiclass_quality,
    normal_difference,
    proportion_difference,
    regression_quality,
    wilson,
)
from .experiments import Settings, judge, measures, settings_of
from .labelling import decisions, hand_labelled_quality
from .paired import paired_accuracy, paired_binary
from .records import canonical_label
from .splits import in_experiment, is_prediction, is_request, label_coverage, sample_ratio_over_time


def _latency(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    values = np.asarray(latencies, dtype=float)
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def _variant_quality(rows: list[dict[str, Any]], evaluation: EvaluationConfig) -> dict[str, Any]:
    labelled = [r for r in rows if r["label"] is not None and r["predicted"] is not None]
    out: dict[str, Any] = {"labelled": len(labelled)}
    if not labelled:
        return out
    labels = [str(r["label"]) for r in labelled]
    predicted = [str(r["predicted"]) for r in labelled]
    if evaluation.task == "binary":
        positive = canonical_label(evaluation.positive_label) or ""
        scores = [r["score"] for r in labelled]
        out.update(binary_quality(labels, predicted, scores, positive))
        if evaluation.costs is not None:
            out.update(_costs(labelled, evaluation.costs, positive))
    elif evaluation.task == "multiclass":
        out.update(multiclass_quality(labels, predicted))
    else:
        pairs = [(_number(a), _number(p)) for a, p in zip(labels, predicted, strict=True)]
        numeric = [(a, p) for a, p in pairs if a is not None and p is not None]
        out["labelled"] = len(numeric)
        if numeric:
            out.update(regression_quality([a for a, _ in numeric], [p for _, p in numeric]))
    return out


def _costs(labelled: list[dict[str, Any]], costs: CostsConfig, positive: str) -> dict[str, Any]:
    """A variant's costs (costs.py): each labelled prediction's amounts, the configured ones
    or those read from its request; one whose amount cannot be read, and that has no
    default, is left out and counted."""
    costed: list[Costed] = []
    scored: list[tuple[bool, float, float, float]] = []
    unread = 0
    for row in labelled:
        features = orjson.loads(row["features"]) if row.get("features") else {}
        fp = _amount(costs.false_positive, features.get(f"{COST_FEATURE_PREFIX}false_positive"))
        fn = _amount(costs.false_negative, features.get(f"{COST_FEATURE_PREFIX}false_negative"))
        if fp is None or fn is None:
            unread += 1
            continue
        truth, flagged = str(row["label"]) == positive, str(row["predicted"]) == positive
        costed.append((truth, flagged, fp, fn))
        if row["score"] is not None:
            scored.append((truth, row["score"], fp, fn))
    found = costed_report(costed, scored)
    out = {
        # the figure beside precision and recall; each prediction's cost for the experiment
        "cost_per_1000": found.pop("cost_per_1000"),
        "costs_each": found.pop("costs_each"),
    }
    if costs.pointers():
        found["amount_unread"] = unread
    out["costs"] = found
    return out


def _amount(configured: float | CostAmount, read: Any) -> float | None:
    if not isinstance(configured, CostAmount):
        return float(configured)
    readable = isinstance(read, int | float) and not isinstance(read, bool)
    return float(read) if readable and math.isfinite(read) and read >= 0 else configured.default


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def build_report(
    rows: list[dict[str, Any]],
    route: RouteConfig,
    since: float,
    until: float,
    weights_at: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The per-variant report of one route over [since, until) from the store's rows;
    ``weights_at``: the route's weights in each configuration version the rows name.

    Shadows are reported beside the live variants, measured against the labels of the live
    predictions they copy, with how often each agreed with the live answer; they take no part
    in the traffic split. Live predictions are also reported by arm, each (variant, served
    model version) apart, and the comparisons are between arms: each against the champion's
    first version served in the window.
    """
    evaluation = route.evaluation or EvaluationConfig()
    by_variant: dict[str, list[dict[str, Any]]] = {v.name: [] for v in route.variants}
    by_shadow: dict[str, list[dict[str, Any]]] = {s.name: [] for s in route.shadows}
    for row in rows:
        (by_shadow if row.get("shadow") else by_variant).setdefault(row["variant"], []).append(row)
    internals: dict[str, dict[str, Any]] = {}
    variants = {
        name: _summary(vrows, route, evaluation, internals, name)
        for name, vrows in by_variant.items()
    }
    shadows = {}
    for name, srows in by_shadow.items():
        shadows[name] = _summary(srows, route, evaluation, internals, name)
        compared = [
            r for r in srows if r["predicted"] is not None and r.get("live_predicted") is not None
        ]
        agreed = sum(1 for r in compared if r["predicted"] == r["live_predicted"])
        shadows[name]["compared_with_live"] = len(compared)
        shadows[name]["agreement_with_live"] = wilson(agreed, len(compared))
    settings = settings_of(route)
    champion = settings.champion
    # Arms: each (variant, served model version) apart, so that a variant redeployed with
    # another model under the same name is two arms, never one.
    by_arm: dict[tuple[str, str], list[dict[str, Any]]] = {}
    first: dict[tuple[str, str], int] = {}
    for position, row in enumerate(rows):
        if not row.get("shadow"):
            key = (row["variant"], str(row["model_version"]))
            by_arm.setdefault(key, []).append(row)
            first.setdefault(key, position)
    arm_internals: dict[str, dict[str, Any]] = {}
    arms = [
        {
            "variant": variant,
            "model_version": version,
            **_plain(_summary(arm_rows, route, evaluation, arm_internals, f"{variant}@{version}")),
        }
        for (variant, version), arm_rows in sorted(by_arm.items())
    ]
    # the champion's arm: the version its variant served first in the window, so that the
    # arm every look compares with only grows (a redeployed champion's new version is a
    # challenger)
    champion_arms = [key for key in by_arm if key[0] == champion]
    champion_arm = min(champion_arms, key=lambda key: first[key]) if champion_arms else None
    comparisons: list[dict[str, Any]] = []
    if route.evaluation and champion_arm is not None:
        base = arm_internals[f"{champion_arm[0]}@{champion_arm[1]}"]
        challengers: list[tuple[str, str | None, dict[str, Any], bool]] = [
            (variant, version, arm_internals[f"{variant}@{version}"], False)
            for variant, version in sorted(by_arm)
            if (variant, version) != champion_arm
        ]
        challengers += [(name, None, internals[name], True) for name in by_shadow]
        for name, version, measured, shadow in challengers:
            comparisons.append(
                {
                    "challenger": name,
                    "challenger_version": version,
                    "champion": champion,
                    "champion_version": champion_arm[1],
                    "shadow": shadow,
                    "fixed_horizon": [asdict(d) for d in _differences(measured, base, evaluation)],
                }
            )
            if shadow and evaluation.task in ("binary", "multiclass"):
                # a shadow answered the same requests as the live variants: paired
                paired = paired_accuracy(by_shadow[name])
                if evaluation.task == "binary":
                    positive_label = canonical_label(evaluation.positive_label) or ""
                    paired.update(paired_binary(by_shadow[name], positive_label))
                comparisons[-1]["paired"] = paired
        _attach_decisions(comparisons, challengers, base, settings, evaluation.task)
    current = {v.name: v.weight for v in route.variants}
    live_rows = [r for r in rows if not r.get("shadow")]
    return {
        "route": route.name,
        "task": evaluation.task if route.evaluation else None,
        "since": since,
        "until": until,
        "champion": champion,
        "experiment": settings.describe(),
        "variants": {name: _plain(v) for name, v in variants.items()},
        "arms": arms,
        "shadows": {name: _plain(v) for name, v in shadows.items()},
        "comparisons": comparisons,
        "sample_ratio": {
            "weights": current,
            **sample_ratio_over_time(live_rows, weights_at or {}, current),
        },
        "label_coverage": label_coverage(live_rows),
    }


def _attach_decisions(
    comparisons: list[dict[str, Any]],
    challengers: list[tuple[str, str | None, dict[str, Any], bool]],
    champion: dict[str, Any],
    settings: Settings,
    task: str,
) -> None:
    """Each comparison's sequential tests and decision (:mod:`.experiments`): the live arms as
    one family, the shadows as another (tested as if independent of the live answers, which
    is conservative for paired answers; the paired tests are fixed-horizon figures)."""
    base = measures(champion, task)
    for shadow in (False, True):
        picked = [
            (index, measures(measured, task))
            for index, (_, _, measured, is_shadow) in enumerate(challengers)
            if is_shadow == shadow
        ]
        judged = judge(base, [(str(i), found) for i, found in picked], settings)
        for index, _ in picked:
            comparisons[index]["decision"] = judged[str(index)]["decision"]
            comparisons[index]["sequential"] = judged[str(index)]["metrics"]


#: a variant's quality figures the comparisons use and the report does not show
_INTERNALS = ("absolute_errors", "auc_se", "mae_se", "costs_each")


def _summary(
    rows: list[dict[str, Any]],
    route: RouteConfig,
    evaluation: EvaluationConfig,
    internals: dict[str, dict[str, Any]],
    name: str,
) -> dict[str, Any]:
    """Requests, versions, errors, latency and quality of one variant's (or shadow's) rows;
    the quality with its internals (for the comparisons) is kept in ``internals[name]``.
    Requests, errors and latency count requests (a batch once); quality counts predictions
    (each row of a batch)."""
    requests = [r for r in rows if is_request(r)]
    errors = sum(1 for r in requests if r["status"] >= 500)
    # quality and the comparisons: the experiment's predictions only (a shadow's rows are
    # copies of live ones, all of them predictions)
    chosen = [r for r in rows if (r.get("shadow") and r.get("inference", True)) or in_experiment(r)]
    measured = [r for r in chosen if is_prediction(r)]
    quality = _variant_quality(measured, evaluation) if route.evaluation else {"labelled": 0}
    experiment_requests = [r for r in chosen if is_request(r)]
    internals[name] = {
        **quality,
        "experiment_requests": len(experiment_requests),
        "experiment_errors": sum(1 for r in experiment_requests if r["status"] >= 500),
    }
    out = {
        "requests": len(requests),
        "model_versions": sorted({r["model_version"] for r in requests}),
        "error_ratio": wilson(errors, len(requests)),
        "latency_ms": _latency([r["latency_ms"] for r in requests]),
        **{k: v for k, v in quality.items() if k not in _INTERNALS},
    }
    predictions = [r for r in rows if is_prediction(r) and r["predicted"] is not None]
    if route.evaluation is not None and evaluation.task == "binary":
        # hand labels of weighted samples, apart from the stream's labels: every prediction
        # of the variant, as the samples are drawn
        hand = [
            (str(r["hand_label"]), str(r["predicted"]), float(r["inclusion_probability"]))
            for r in predictions
            if r.get("hand_label") is not None
        ]
        if hand:
            positive = canonical_label(evaluation.positive_label) or ""
            out["hand_labelled"] = hand_labelled_quality(hand, positive)
    decided = [
        (r.get("outcome"), r.get("value"))
        for r in rows
        if not r.get("shadow") and (r.get("outcome") is not None or r.get("value") is not None)
    ]
    if decided:
        # people decide on the live answer: a shadow's is nobody's recommendation
        out["decisions"] = decisions(decided)
    return out


def _differences(
    challenger: dict[str, Any], champion: dict[str, Any], evaluation: EvaluationConfig
) -> list[Difference]:
    if not challenger.get("labelled") or not champion.get("labelled"):
        return []
    if evaluation.task == "regression":
        if challenger.get("mae_se") is None or champion.get("mae_se") is None:
            return []
        return [
            normal_difference(
                "mae",
                challenger["mae"].value,
                challenger["mae_se"],
                champion["mae"].value,
                champion["mae_se"],
            )
        ]
    if evaluation.task == "multiclass":
        c1, c0 = challenger["accuracy"], champion["accuracy"]
        n1, n0 = challenger["labelled"], champion["labelled"]
        return [
            proportion_difference("accuracy", round(c1.value * n1), n1, round(c0.value * n0), n0)
        ]
    m1, m0 = challenger["confusion"], champion["confusion"]
    out = [
        proportion_difference(
            "precision", m1["tp"], m1["tp"] + m1["fp"], m0["tp"], m0["tp"] + m0["fp"]
        ),
        proportion_difference(
            "recall", m1["tp"], m1["tp"] + m1["fn"], m0["tp"], m0["tp"] + m0["fn"]
        ),
        proportion_difference(
            "accuracy", m1["tp"] + m1["tn"], sum(m1.values()), m0["tp"] + m0["tn"], sum(m0.values())
        ),
        bootstrap_f1_difference(_outcome_array(m1), _outcome_array(m0)),
    ]
    if challenger["auc"].value is not None and champion["auc"].value is not None:
        out.append(
            normal_difference(
                "auc",
                challenger["auc"].value,
                challenger["auc_se"],
                champion["auc"].value,
                champion["auc_se"],
            )
        )
    return out


def _outcome_array(confusion: dict[str, int]) -> np.ndarray:
    return np.repeat(
        np.arange(4), [confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"]]
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Estimate):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
